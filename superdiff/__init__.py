"""SuperDiff studio: compose pretrained diffusion models at sampling time."""

__version__ = "0.1.0"

from .experts import ExpertList, ExpertSet, GaussianMixtureExpert, SharedNetworkExperts
from .operators import AndOperator, AverageOperator, OrOperator, SingleOperator, make_operator
from .sampling import SampleOutput, sample
from .schedules import RectifiedFlow, VESigma, VPDiscrete, make_betas, schedule_from_config
from .step import superdiff_step
from .trace import Trace, plot_trace

__all__ = [
    "__version__", "sample", "SampleOutput", "superdiff_step", "Trace", "plot_trace",
    "ExpertSet", "ExpertList", "SharedNetworkExperts", "GaussianMixtureExpert",
    "OrOperator", "AndOperator", "AverageOperator", "SingleOperator", "make_operator",
    "VPDiscrete", "VESigma", "RectifiedFlow", "make_betas", "schedule_from_config",
]
