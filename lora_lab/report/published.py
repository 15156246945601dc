"""The published numbers the report's tables stand beside ours (../shared/ANCHORS.md), each with its source."""

from __future__ import annotations

# The papers, as the tables cite them.
HU = "Hu et al. 2021 (arXiv 2106.09685)"
WR = "LoRA Without Regret (Schulman & Thinking Machines, 2025)"
PEFT = "PEFT method comparison, Llama-3.2-3B MetaMathQA->GSM8K, one seed"
QLORA = "QLoRA (Dettmers et al. 2023, arXiv 2305.14314)"
PUBLISHED_PARAMS = {("mlp", 256): 0.49e9, ("attn", 256): 0.25e9, ("all-linear", 256): 0.70e9, ("mlp", 128): 0.24e9}
PUBLISHED_PARAMS_NO_HEAD = {
    ("mlp", 256): 0.453e9,
    ("attn", 256): 0.218e9,
    ("all-linear", 256): 0.671e9,
    ("mlp", 128): 0.226e9,
}
PUBLISHED_METHODS = {  # our method label -> what the papers report for it
    "LoRA": f"RoBERTa-base 0.3M params, GLUE avg 87.2; GPT-3 4.7M, WikiSQL 73.4 [{HU} Tables 2, 4]; "
    f"Llama-3.2-3B q,v r=32 9.2M, GSM8K 0.482, 22.3 GB, 1796 s [{PEFT}]",
    "rsLoRA": f"Llama-3.2-3B q,v r=64 18.4M, GSM8K 0.530 (0.489 without rsLoRA), 22.5 GB, 1871 s [{PEFT}]",
    "LoRA+": "B's LR ~16x A's [LoRA+ paper]; no same-quantity number in ANCHORS.md",
    "full FT": f"RoBERTa-base 125.0M, GLUE avg 86.4; GPT-3 175,255.8M, WikiSQL 73.8 [{HU} Tables 2, 4]; "
    f"Llama-3.2-3B 3.21B, GSM8K 0.500, 37.2 GB, 3111 s [{PEFT}]",
}
PUBLISHED_METHODS.update(  # Hu et al. Tables 2-4 (ANCHORS.md "Baselines beside LoRA"): the comparison methods
    {
        "BitFit": f"RoBERTa-base 0.1M, GLUE avg 85.2; GPT-3 14.2M, WikiSQL 71.3 / MNLI-m 91.0 [{HU} Tables 2, 4]",
        "IA3": "not in Hu et al.; no same-quantity number in ANCHORS.md",
        "AdapterH": f"RoBERTa-large 0.8M, GLUE avg 86.4; GPT-2 M 11.09M, E2E BLEU 67.3; GPT-3 7.1M, WikiSQL 71.9 "
        f"[{HU} Tables 2-4]",
        "AdapterL": f"GPT-2 M 0.37M, E2E BLEU 66.3; 11.09M, BLEU 68.9 [{HU} Table 3]",
        "PreEmbed": f"GPT-3 3.2M, WikiSQL 63.1 / MNLI-m 88.6 [{HU} Table 4]",
        "PreLayer": f"GPT-2 M 0.35M, E2E BLEU 69.7; GPT-3 20.2M, WikiSQL 70.1 / MNLI-m 89.5 [{HU} Tables 3, 4]",
    }
)
PUBLISHED_TARGETS = {  # Hu et al. Table 5, GPT-3 175B at 18M params: WikiSQL / MultiNLI accuracy (%)
    "Wq": "70.4 / 91.0 (r=8)",
    "Wk": "70.0 / 90.8 (r=8)",
    "Wv": "73.0 / 91.0 (r=8)",
    "Wo": "73.2 / 91.3 (r=8)",
    "Wq+Wk": "71.4 / 91.3 (r=4)",
    "Wq+Wv": "73.7 / 91.3 (r=4)",
    "attention": "73.7 / 91.7 (r=2)",
}
PUBLISHED_TARGETS_WR = {
    "attention": "underperforms MLP-only even at matched params (attn r=256 vs MLP r=128)",
    "MLP": "about as good as all layers",
    "all linear": "best or tied with MLP-only",
}
PUBLISHED_RANKS = {  # Hu et al. Table 6, WikiSQL accuracy (%) at r = 1, 2, 4, 8, 64
    "Wq": {1: 68.8, 2: 69.6, 4: 70.5, 8: 70.4, 64: 70.0},
    "Wq+Wv": {1: 73.4, 2: 73.3, 4: 73.7, 8: 73.8, 64: 73.5},
    "attention": {1: 74.1, 2: 73.7, 4: 74.0, 8: 74.0, 64: 73.9},
}

PUBLISHED_PRECISION = {  # model.quantize -> QLoRA's numbers for a base stored that way (16-bit LoRA for 'none')
    "none": f"BF16 LoRA: MMLU 53.0 (5-shot, mean of eight LLaMA 7-65B runs) [{QLORA}]",
    "nf4": f"NF4 + double quantization: MMLU 53.1; Pile-CC perplexity 27.41 (mean, 125M-13B); 0.516 B/param [{QLORA}]",
    "fp4": f"FP4: MMLU 52.2; Pile-CC perplexity 31.07 (E2M1), 29.48 (E3M0) [{QLORA}]",
    "int8": "- (QLoRA reports no 8-bit LoRA run; LLaMA-Factory's rule of thumb: ~1 GB per B params)",
}
