"""Automatic checks for the course assignments in assignments/ (see assignments/README.md).

    report     CheckFailed and the comparisons every check uses; problems: the seeded toy blocks
    attention  assignment 01: check_softmax, check_causal_attention, check_decode
    flow       assignment 02: check_shift, check_flow_forward, check_flow_inverse
    jacobi     assignment 03: check_jacobi_update, check_jacobi_inverse, check_gs_jacobi_inverse
    course     release (student versions) and grade (points), the CLI's `assignments`
"""
from .report import CheckFailed

__all__ = ["CheckFailed"]
