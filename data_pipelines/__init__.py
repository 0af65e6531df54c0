"""Input pipelines: TFRecord I/O, Grain pipelines, dataset converters and transforms."""
