"""A/B testing: deterministic assignment, routing, exposure logs, outcome replay, analysis.

The data path of an experiment::

    experiments YAML --> ABRouter.route(user) --> serve the arm's model --> ExposureLogger
    configs.py           bucketing.py, router.py                            exposure.py
        --> cobra ab outcomes --> cobra ab analyze
            outcomes.py           stats.py, analyze.py

``cobra ab assign`` (assign.py) routes a users table offline with the same code;
``cobra ab reshare`` changes arm shares moving the fewest users. Nothing here imports
torch or ray: the Serve ingress imports :class:`cobra_scale.ab.router.ABRouter` and
:class:`cobra_scale.ab.exposure.ExposureLogger` directly.
"""
