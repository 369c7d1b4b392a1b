"""The torch meaning of IR values that the backends and the runtime share: host evaluation of
hyperparameter and step maths (:mod:`~optgen.numerics.host`), matrix views and packed bits
(:mod:`~optgen.numerics.matrix_view`), the Newton-Schulz orthogonalisers
(:mod:`~optgen.numerics.newton_schulz`) and adv_optm's stochastic rounding stream
(:mod:`~optgen.numerics.stochastic`). Pure functions of tensors and IR nodes: they sit below the
backends and the runtime, so neither imports the other to reach them."""
