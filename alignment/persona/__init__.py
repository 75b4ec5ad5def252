"""LAPDOG-style retrieval-augmented persona dialogue, trained by REINFORCE or GRPO.

A Contriever-style bi-encoder (:mod:`.retriever`, :mod:`.index`) finds story passages for a
persona; a T5 Fusion-in-Decoder reader (:mod:`.reader`) answers the dialogue context from them;
it is trained first by teacher forcing (the SFT stage), then by policy gradient against a
text-overlap reward with the gold response (:mod:`.reward`), REINFORCE or GRPO on the shared
core :mod:`alignment.pg`, while the retriever is distilled toward the reader's per-passage
rewards. :mod:`.train` is the command line; :mod:`.toy` builds the tiny models and the synthetic
task used by the tests, the demo and the benchmark. Data parallel under torchrun (process group,
device, DDP wrapping, collectives) is :mod:`alignment.distributed`'s.
"""
