"""Automatic checks for the course assignments in assignments/ (see assignments/README.md).

    report     CheckFailed and the comparisons every check uses; problems: the seeded toy blocks
    attention  assignment 01: check_softmax, check_causal_attention, check_decode
    flow       assignment 02: check_shift, check_flow_forward, check_flow_inverse
    jacobi     assignment 03: check_jacobi_update, check_jacobi_inverse, check_gs_jacobi_inverse
    likelihood assignment 04: check_dequantize, check_nll_per_dim, check_bits_per_dim
    guidance   assignment 05: check_guide, check_annealed_weight, check_guided_inverse
    denoising  assignment 06: check_gaussian_score, check_tweedie, check_step_size,
               check_denoise_with_loss_gradient
    course     release (student versions) and grade (a Report: points per part, flags, time), the
               CLI's `assignments`; gradebook: a class graded in parallel into reports and a CSV
    kernel     the student's kernel seen from the grader: cells run there, checks run here against
               proxies of the student's functions; remote: the grader's agent inside that kernel;
               wire: the plain data (no pickle) that crosses between them
    sandbox    containment of the kernel: its own user id, namespaces, limits, everything killed
    integrity  the flags read from a submission's code (the package's own code, the machinery)
"""
from .report import CheckFailed

__all__ = ["CheckFailed"]
