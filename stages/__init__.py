"""The stage worker: engine, paged KV, compute backends.

OpenMP threads (torch's and numba's) that finish a parallel region spin for a while before they sleep
(libgomp's default, ~300000 spins): on a machine shared with a gateway, another stage or anything else,
a stage's spinning threads take the cores its working threads need. A SmolLM2 Q4_1 decode step on
2 cores (AMD EPYC, AVX-512), 2 threads: alone 10.3 ms with the default spin, 10.4 with 10000 spins,
23.9 passive; beside two busy processes 107 ms, 46, 39. So a stage spins 10000 times unless the
environment says otherwise (this runs before torch loads libgomp in a stage process).
"""

import os

os.environ.setdefault("GOMP_SPINCOUNT", "10000")
