"""Shared defaults every other config starts from (one place for seeds, paths and the mesh)."""

import ml_collections


def get_config(arg=None):
  del arg
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.workdir = "runs/default"
  c.resolution = 64
  # Mesh: sizes per axis (data, fsdp, tensor); -1 = infer from the device count.
  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1, dcn_data=1))
  c.num_workers = 2  # worker processes for data generation / input pipelines
  # Users' modules (dotted names or .py paths) that register their own fields and modalities
  # (fourm.modalities); every command imports them before it reads data or builds a model.
  c.modules = ()
  return c
