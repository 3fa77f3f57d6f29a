"""Cold-start SFT: `torchrun -m trainers.sft --config job.json`."""
