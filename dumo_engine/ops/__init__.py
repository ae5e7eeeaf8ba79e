"""Fused ops, one per module: Triton kernels, host launcher, autograd registration, public function.

Import from the module, e.g. `from dumo_engine.ops.attention_jvp import attention_jvp`. The package does not
re-export the functions: a function named like its module would shadow the module attribute
(dumo_engine.ops.attention_jvp), which breaks `import dumo_engine.ops.attention_jvp as m` and monkeypatching.
"""
