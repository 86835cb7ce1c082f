"""The streaming worker (Faust on Kafka): ingest -> train online -> publish snapshots -> serve.

settings.py  WorkerSettings (pydantic-settings, SPARC_* environment): the only module reading the environment
records.py   message schemas and validation (Feedback, ItemEvent, TrainExample; validate_* -> record | Invalid)
history.py   the per-user table value: last items + recent event ids (de-duplication)
batching.py  feedback micro-batch -> one train-topic message (TrainBatch) -> OnlineLearner.learn's inputs
app.py       the Faust app factory and its topics;  topics.py  creating them with the right partition counts
agents.py    ingest / train / catalog agents and the publishing timer (thin: they call the modules here and
             trainer.online, which holds the learning step that replay shares)
gate.py      the health gate: thresholds and the reasons a snapshot may not become latest
publisher.py codebook store (versions, warm start with a corrupt latest), codebook-updates message (the only
             import of codebook_store)
index.py     the serving index (frozen model + faiss/brute-force retriever), swapped atomically
views.py     /retrieve/{user_id}, /snapshots/latest, /health, /metrics;  metrics.py  the Prometheus registry
outputs.py   where agents send (DLQ, train topic, codebook-updates), injectable for tests
worker.py    StreamWorker: wires the above into one process (`sparc worker`)
"""
