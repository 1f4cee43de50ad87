"""Studies of differentiating through EM: how accurate, stable and costly the gradient modes of
:func:`imgmw.fit_gmm` are (``"unrolled"`` AD, ``"implicit"``, ``"one_step"``, the warm start), extending the
experiments of Boïté et al. (2025). ``python -m apps.em_gradients`` is their command-line front end.

- :mod:`~imgmw.studies.problems`: random mixtures of a given conditioning, targets, losses;
- :mod:`~imgmw.studies.measures`: relative errors, fixed-point errors, quartiles, log-log slopes;
- :mod:`~imgmw.studies.memory`: :class:`SavedTensorMeter`, bytes autograd saves for backward;
- one module per study, each returning a JSON-able dict of results: :func:`accuracy_study`,
  :func:`flow_study` (a :class:`FlowStudy` with the trajectories), :func:`stability_study`, :func:`scaling_study`.
"""
from .accuracy import accuracy_setting, accuracy_study
from .measures import first_below, fixed_point_error, loglog_slope, quartiles, relative_error, theta_vector
from .memory import SavedTensorMeter
from .particle_flow import FLOW_MODES, FlowStudy, converged_energy, flow_run, flow_study
from .problems import (CONDITIONS, LOSS_MW2, LOSS_NAMES, LOSS_PARAM, MODES, SEPARATIONS, flow_problem, make_loss,
                       parameter_loss, random_gmm, random_rotation, scaling_problem, seeded, shifted_target,
                       stability_truth)
from .scaling import DENSE_LIMIT_BYTES, backward_cost, dense_bytes, dense_cost, scaling_study
from .stability import stability_study

__all__ = ["accuracy_study", "accuracy_setting", "flow_study", "flow_run", "FlowStudy", "converged_energy",
           "stability_study", "scaling_study", "backward_cost", "dense_cost", "dense_bytes", "SavedTensorMeter",
           "relative_error", "fixed_point_error", "theta_vector", "quartiles", "loglog_slope", "first_below",
           "random_rotation", "random_gmm", "shifted_target", "parameter_loss", "make_loss", "seeded",
           "stability_truth", "flow_problem", "scaling_problem", "CONDITIONS", "SEPARATIONS", "MODES",
           "FLOW_MODES", "LOSS_MW2", "LOSS_PARAM", "LOSS_NAMES", "DENSE_LIMIT_BYTES"]
