"""`xpm`: XPM (seed 003): teacher/student networks (`model`), their losses (`losses`) and the method
(`method`): instance pseudo-masks with noise maps and reliability."""

from ovseg.core.methods.xpm.method import XPM  # noqa: F401
