"""The two ways a collective runs.

- :mod:`.lazy`: mx.arrays go into MLX's graph through mlx-c's distributed
  functions and come back as lazy mx.arrays (MLX's semantics: grads,
  mx.compile, vmap, streams; communication happens at evaluation).
- :mod:`.eager`: numpy arrays and registered buffers go straight to the
  backend and the call returns when the result is there.

:mod:`.fillins` composes what a backend lacks, once for both.
"""
