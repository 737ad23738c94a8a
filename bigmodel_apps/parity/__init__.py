"""The parity harness: every layer / model run in both implementations and compared by name."""

from bigmodel_apps.parity.harness import REGISTRY, Case, CaseData, Row, compare, gradcheck_case, register

__all__ = ["REGISTRY", "Case", "CaseData", "Row", "compare", "gradcheck_case", "register"]
