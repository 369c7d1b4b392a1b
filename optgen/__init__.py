"""optgen: an optimizer compiler for PyTorch.

Pipeline: ``specs/*.yaml`` --load--> :class:`optgen.spec.Spec` --features--> --lower-->
:class:`optgen.ir.Program` --schedule--> phases --render--> ``generated/<name>.py``.
"""

__version__ = "0.1.0"
