"""Fine-tuning on corrected cases, and the trainers that let nnU-Net itself train our networks."""
