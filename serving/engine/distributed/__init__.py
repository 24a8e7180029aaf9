"""Parallel serving in the builtin engine: data-parallel replicas, tensor parallel (DeepSpeed AutoTP) and
pipeline stages. See docs/parallel.md for the process layout and the step protocol.

Entry points:
  validate.validate_parallel(config, model_config, num_devices)  -> ConfigError before anything starts
  build.build_parallel_engine(config)                            -> an LLMEngine over tp x pp ranks
  data_parallel.DataParallelEngine.from_config(config)           -> dp replicas behind one EngineClient
"""
