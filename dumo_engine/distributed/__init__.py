"""Multi-GPU and multi-node training with DeepSpeed ZeRO (stages 0-3).

  ds_config.py   configs/deepspeed/zero{0,1,2,3}.json with "auto" filled from the run config, checked up front
  engine.py      process group, DeepSpeedBackend (the training loop's engine under DeepSpeed), sharded EMA
  checkpoint.py  DeepSpeed sharded save/resume through the engine's atomic checkpoint layout + consolidated weights
  memory.py      `dumo plan-memory`: predicted per-GPU memory for each ZeRO stage

deepspeed is imported only when a run asks for it (train.deepspeed), with an error saying how to install it.
"""
