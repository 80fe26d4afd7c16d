"""The stage worker: engine, paged KV, compute backends.

OpenMP threads (torch's and numba's) that finish a parallel region spin for a while before they sleep
(libgomp's default, ~300000 spins): on a machine shared with a gateway, another stage or anything else,
a stage's spinning threads take the cores its working threads need. SmolLM2 Q4_1 on 2 cores (AMD EPYC,
AVX-512), 2 threads per stage: one decode step in process alone 10.3 ms with the default spin, 10.4 with
10000 spins, 10.7 with 1000, 23.9 passive; beside two busy processes 107 ms, 46, 48, 39; served by
`parallax up --stages 2` (two stages on the 2 cores), one stream / 16 streams: 51.8 / 112 tok/s with
10000 spins, 61.9 / 153 with 1000. So a stage spins 1000 times unless the environment says otherwise
(this runs before torch loads libgomp in a stage process).
"""

import os

os.environ.setdefault("GOMP_SPINCOUNT", "1000")
