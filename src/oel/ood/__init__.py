"""Out-of-distribution probe: does distilling game knowledge cost the policy its general skills?

Two numbers per round, both from files shipped in oel/eval_data: the fraction of ~50 verifiable
instruction prompts answered correctly (greedy), and the mean token log-likelihood of held-out prose.
`eval.ood: ifeval` scores lm-eval's IFEval task instead (oel.ood.ifeval: GPU, network or a cached copy).
"""

from oel.ood.probe import (
    InstructionPrompt,
    compare_to_base,
    load_heldout_text,
    load_instructions,
    run_probe,
    score_responses,
)

__all__ = ["InstructionPrompt", "compare_to_base", "load_heldout_text", "load_instructions", "run_probe",
           "score_responses"]
