"""On-policy context distillation (the paper's "consolidation"): knowledge in the teacher's prompt -> weights.

loss.py (pure torch), dataset.py (rows -> schedule and tokens), checkpoints.py (which checkpoint to trust),
microbatch.py and prefix.py (memory and speed of a step, same results), layers.py (per-layer switches),
trainer.py (a run: arguments, placement, training, saving), sdft.py (the TRL trainer subclass, imported only
when a trainer is built), vllm_sync.py (the LoRA student's weights for colocated vLLM), demo.py (the French
demo). TRL and PEFT are imported in this package only. The stage is oel.stages.distill.
"""
