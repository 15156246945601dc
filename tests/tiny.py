"""The overrides a test run starts from: the tiny model (built from its config, no download) on the tiny sentiment
task, the smoke trainer, no progress bar. Each test module adds what it needs (threads, tracking, steps)."""

TINY_RUN = ["model=tiny", "data=tiny_sentiment", "trainer=smoke", "trainer.progress=false"]
