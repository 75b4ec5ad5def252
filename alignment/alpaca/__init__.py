"""Alpaca-7B recovery: LLaMA-7B (HF format) + Stanford's published weight diff -> an HF folder.

python -m alignment.alpaca.recover --base models/llama-7b-hf --output models/alpaca-7b
sbatch alignment/alpaca/recover_alpaca_full.sh
"""
