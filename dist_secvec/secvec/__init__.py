"""The security vector: a frozen low-rank delta on chosen linear layers.

On a linear layer with weight W (N x K) the vector adds
    y = x W^T + s * (x A^T) B^T          A: r x K, B: N x r, s = alpha / r

One module per concern:
    io           the vector on disk: SecurityVector, load / save, file hashes, digest
    fingerprint  the base model a vector belongs to, and the checks that refuse another
    layer        SecVecLinear, the layer that applies it (and which computation it takes)
    lora         the vector and a trainable peft LoRA on one layer, in one kernel
    compose      several vectors as one delta per layer (VectorSet): ranks concatenated, scales in B
    attach       putting SecVecLinears into a model for stage 2, and taking them out
    fold         adding s B A into a frozen 16/32-bit base weight once instead
"""

from dist_secvec.secvec.attach import attach_security_vector, detach_security_vector
from dist_secvec.secvec.compose import (VectorSet, check_same_base, compose_vectors, load_vector_set, part_modules,
                                        vector_parts, vectors_record)
from dist_secvec.secvec.fingerprint import (base_fingerprint, check_fingerprint, check_fingerprint_on_disk,
                                            linear_shape, resolve_model_dir, weights_hash)
from dist_secvec.secvec.fold import (FOLDABLE_DTYPES, FoldedLayer, fold_partitioned, fold_security_vector, fold_weight,
                                     unfold_from_disk, unfold_security_vector)
from dist_secvec.secvec.io import (ADAPTER_CONFIG, ADAPTER_WEIGHTS, DEFAULT_BEHAVIOUR, META_FILE, PEFT_PREFIX,
                                   PROBE_FILE, SecurityVector, behaviour_record, load_security_vector,
                                   record_file_hashes, rows_word, save_security_vector, vector_digest)
from dist_secvec.secvec.layer import (PATHS, PathOptions, SecVecLinear, choose_path, describe_paths, layers_off,
                                      only_vector, path_calls, row_gate, security_vector_layers, security_vector_off)
from dist_secvec.secvec.lora import register_zero3_external_params

__all__ = [
    "ADAPTER_CONFIG", "ADAPTER_WEIGHTS", "DEFAULT_BEHAVIOUR", "FOLDABLE_DTYPES", "META_FILE", "PATHS", "PEFT_PREFIX",
    "PROBE_FILE", "attach_security_vector", "base_fingerprint", "behaviour_record", "check_fingerprint",
    "check_fingerprint_on_disk", "check_same_base", "choose_path", "compose_vectors", "describe_paths",
    "detach_security_vector", "fold_partitioned", "fold_security_vector", "fold_weight", "FoldedLayer", "layers_off",
    "linear_shape", "load_security_vector", "load_vector_set", "only_vector", "part_modules", "path_calls",
    "PathOptions", "record_file_hashes", "register_zero3_external_params", "resolve_model_dir", "row_gate",
    "rows_word", "save_security_vector", "security_vector_layers", "security_vector_off", "SecurityVector",
    "SecVecLinear", "unfold_from_disk", "unfold_security_vector", "vector_digest", "vector_parts", "VectorSet",
    "vectors_record", "weights_hash",
]
