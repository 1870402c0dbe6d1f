"""On-policy context distillation (the paper's "consolidation"): knowledge in the teacher's prompt -> weights.

loss.py (pure torch), dataset.py (rows -> schedule and tokens), checkpoints.py (which checkpoint to trust),
trainer.py (the only TRL/PEFT user), demo.py (the French demo). The stage is oel.stages.distill.
"""
