"""Synthetic tasks for training and checking RMTs without downloads."""

from .memory_tasks import (
    ANSWER_TOKEN_IDS,
    ANSWERS,
    CHANCE,
    CLS_ID,
    NUM_ANSWERS,
    PAD_ID,
    SEP_ID,
    TASKS,
    VOCAB,
    VOCAB_SIZE,
    Example,
    MemoryTaskDataset,
    decode,
    encode,
    lm_labels,
    make_batch,
    make_example,
)

__all__ = ["ANSWER_TOKEN_IDS", "ANSWERS", "CHANCE", "CLS_ID", "NUM_ANSWERS", "PAD_ID", "SEP_ID", "TASKS", "VOCAB",
           "VOCAB_SIZE", "Example", "MemoryTaskDataset", "decode", "encode", "lm_labels", "make_batch",
           "make_example"]
