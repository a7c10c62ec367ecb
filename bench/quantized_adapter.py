"""How much of an adapter's effect an 8-bit base keeps: unmerged (what load_model does) against
merged into the int8 weights and re-quantized (what it did before), with real bitsandbytes on CPU.

Per-token KL divergences (nats) over a few texts, against the full-precision model with the adapter
merged in fp32 (the model the adapter was trained to make):

    .venv/bin/python bench/quantized_adapter.py --adapter runs/quick/models/sft [--model smollm2-135m]

Use a trained adapter (a random LoRA of the same size barely moves the logits). Five model loads,
about a minute on 2 cores for the 135M model.
"""

from __future__ import annotations

import argparse
import warnings

TEXTS = [
    "Instruction: Name a colour.\nResponse: Blue is a colour of the sky and the sea.",
    "Instruction: What is 2 + 2?\nResponse: It is four, since two and two make four.",
    "Instruction: Write a haiku about rain.\nResponse: Soft rain on the roof, the garden drinks in silence",
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--adapter", required=True, help="a trained LoRA adapter folder (e.g. runs/quick/models/sft)")
    parser.add_argument("--model", default="smollm2-135m", help="the base the adapter was trained on")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")

    import torch
    from peft import PeftModel

    from cai_bootstrap.models.loading import load_model

    torch.set_num_threads(2)
    tok = load_model(args.model).tokenizer
    batch = tok(TEXTS, return_tensors="pt", padding=True)
    mask = batch["attention_mask"].bool()

    def logits(model):
        with torch.no_grad():
            return model(**batch).logits.float()[mask]

    def kl(p, q) -> float:
        lp, lq = p.log_softmax(-1), q.log_softmax(-1)
        return float((lp.exp() * (lp - lq)).sum(-1).mean())

    fp32 = logits(load_model(args.model).model)
    true = logits(load_model(args.model, adapters=[args.adapter]).model)
    int8 = logits(load_model(args.model, quantization="8bit").model)
    unmerged = logits(load_model(args.model, quantization="8bit", adapters=[args.adapter]).model)
    merged = logits(PeftModel.from_pretrained(load_model(args.model, quantization="8bit").model,
                                              args.adapter).merge_and_unload())
    rows = [
        ("the adapter's effect: KL(fp32+adapter || fp32)", kl(true, fp32)),
        ("int8 on the base alone: KL(fp32 || int8)", kl(fp32, int8)),
        ("unmerged on int8: KL(fp32+adapter || int8+adapter unmerged)", kl(true, unmerged)),
        ("merged into int8: KL(fp32+adapter || int8 merged, re-quantized)", kl(true, merged)),
        ("merged vs unmerged: KL(int8+adapter unmerged || int8 merged)", kl(unmerged, merged)),
        ("adapter dropped: KL(int8+adapter unmerged || int8)", kl(unmerged, int8)),
    ]
    for label, value in rows:
        print(f"{value:10.4f}  {label}")


if __name__ == "__main__":
    main()
