"""One-shot chat with any model spec (used by `oel chat`)."""

from __future__ import annotations

from oel.config import ModelParams
from oel.models import load_model


def answer(question: str, spec: str, cfg: ModelParams, max_new_tokens: int = 128) -> str:
    import torch

    loaded = load_model(spec, cfg)
    tok = loaded.tokenizer
    text = tok.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                   add_generation_prompt=True)
    ids = tok(text, return_tensors="pt", add_special_tokens=False).to(loaded.device)
    with torch.no_grad():
        out = loaded.model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False,
                                    pad_token_id=tok.pad_token_id)
    return tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True).strip()
