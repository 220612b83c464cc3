"""dist-secvec: fine-tuning that keeps harmful behaviour unlearnable with frozen security vectors.

Stage 1 (`train-sv`) trains a small low-rank security vector on harmful data; stage 2
(`finetune`) trains the model with the vector active and frozen, so harmful samples give almost
no gradient to the core; `eval` and `export` use the model with the vector off.
"""

__version__ = "0.1.0"
