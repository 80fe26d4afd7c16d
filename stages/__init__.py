"""The stage worker: engine, paged KV, compute backends.

OpenMP threads (torch's and numba's share torch's libgomp in a stage) that finish a parallel region spin
``GOMP_SPINCOUNT`` times (one ``pause`` each) before they sleep on a futex; the next region then has to wake
them. A stage step is ~150 parallel regions (SmolLM2, 30 layers) with Python between them, so a spin shorter
than those gaps puts a wake-up (a cross-CPU interrupt, costly in a VM) before nearly every region; a spin far
longer than them keeps a core busy after the step, when a gateway, nats-server or another stage of the machine
needs it. Measured, SmolLM2 Q4_1, 2 threads on 2 cores, one stream of 300 tokens through `parallax up`:
- Intel Xeon (Ice Lake class: AVX-512 VNNI, no AVX-512 BF16; a `pause` 15 ns), tok/s in two rounds, with
  1000 / 3000 / 10000 / 30000 / 100000 spins: `--stages 1` 52, 70 / 76, 82 / 86, 86 / 92, 93 / 83, 108;
  `--stages 2` 59, 52 / 72, 63 / 68, 60-66 / 74, 66-69 / 63; served step 12.2-17.9 ms with 1000 spins against
  10.0 with 30000 (a third of the stage's CPU went to futex wake-ups), and in process alone the step took
  9.5-10.5 ms with 30000 spins and 10-41 ms with 1000. SmolLM2 bf16, 16 streams: `--stages 1` 168 vs 120 tok/s,
  `--stages 2` 157-180 vs 102-149 (30000 vs 1000).
- AMD EPYC (avx512_bf16), before stages on one machine took turns on its cores (stages.cores): 1000 spins
  beat 10000 with two 2-thread stages stepping at once on 2 cores (61.9 / 153 tok/s vs 51.8 / 112), where
  every spinning thread kept a core from the other stage's; alone 10.7 ms a step vs 10.4 (10000) and 10.3
  (libgomp's default 300000, which beside two busy processes took 107 ms against 46).
So a stage spins 30000 times (~0.5 ms here) unless the environment says otherwise (this runs before torch
loads libgomp in a stage process).
"""

import os

os.environ.setdefault("GOMP_SPINCOUNT", "30000")
