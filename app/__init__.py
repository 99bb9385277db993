"""The web service: REST API, pages, database, queue and worker around the finetune engine."""
