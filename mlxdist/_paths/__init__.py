"""The two ways a collective runs.

- :mod:`.lazy`: mx.arrays go into MLX's graph through mlx-c's distributed
  functions and come back as lazy mx.arrays (MLX's semantics: grads,
  mx.compile, vmap, streams; communication happens at evaluation).
- :mod:`.eager`: numpy arrays and registered buffers go straight to the
  backend and the call returns when the result is there.

:mod:`.fallbacks` composes what a backend lacks, once for both;
:mod:`.p2p` checks broadcast, gather, scatter and all_to_all (which MLX
lacks everywhere) and picks the path; :mod:`.p2p_lazy` and :mod:`.p2p_eager`
build them from send/recv on the schedules of :mod:`.trees`; :mod:`.foreign`
views buffers and DLPack tensors for the eager path.

Every function here receives the group's record
(:class:`mlxdist.group_record.GroupRecord`), never the Group itself.
"""
