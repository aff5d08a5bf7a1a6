"""cpu_tactics: placeholder."""
from optic.registry import register


@register
class CpuTactics:
    name = "cpu_tactics"
    exact = True
    description = "oneDNN kernels with fused activations and prepacked weights, chosen by measurement"

    def run(self, program, ctx) -> bool:
        return False
