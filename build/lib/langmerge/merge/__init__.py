"""Merging experts into one model: pure methods, LoRA-space merging, streaming full-model merge."""

from langmerge.merge.lora import LoraUpdate, merge_lora, merge_lora_factored, merge_lora_peft
from langmerge.merge.methods import METHODS, MergeParams, get_method, merge_deltas
from langmerge.merge.regmean import regmean, regmean_lora

__all__ = [
    "METHODS",
    "LoraUpdate",
    "MergeParams",
    "get_method",
    "merge_deltas",
    "merge_lora",
    "merge_lora_factored",
    "merge_lora_peft",
    "regmean",
    "regmean_lora",
]
