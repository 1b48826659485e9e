"""Online serving with Ray Serve: ``cobra serve`` and ``cluster/serve_config.yaml``.

Request path (see docs/serving.md)::

    HTTP JSON  ->  Ingress (api.py + service.py: validation, user histories, named model slots)
               ->  Recommender (engine.py: batched beam search + BeamFusion, @serve.batch)
               ->  IndexShard x N (shards.py: items of one catalogue range; fan out, merge)

Modules without Ray: ``schemas`` (request/response contract), ``api`` (FastAPI app),
``service`` (ingress logic), ``engine`` (model side), ``shards`` (fan-out/merge),
``bundle`` (item vectors per run), ``fuzz`` (malformed requests for tests and load tests).
Ray lives in ``deployments``, ``app`` (the builder) and ``run_serve`` (the command).
"""
