"""Parallel serving in the builtin engine: data-parallel replicas, tensor parallel (DeepSpeed AutoTP) and
pipeline stages. serving.engine.factory picks among them; docs/parallel.md has the process layout and the
step protocol.

  validate.validate_parallel(config, model_config, num_devices)  -> ConfigError before anything starts
  rank_group.start_rank_group(config)         -> rank 0's part of a tp x pp replica, its workers spawned
  tp_engine / pipeline_engine                 -> rank 0's engine of that replica (an LLMEngine)
  data_parallel.DataParallelEngine            -> dp replicas (replica.py) behind one EngineClient
  worker.py                                   -> ranks 1.. of a replica
"""
