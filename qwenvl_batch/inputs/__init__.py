"""Readers for inputs that are datasets rather than tables of references (used by :mod:`qwenvl_batch.manifest`).

* :mod:`.patterns`: brace ranges and lists, globs, and which format a path names;
* :mod:`.folder`: a folder or glob of image files, one row per image;
* :mod:`.parquet_images`: Hugging Face image Parquet and img2dataset Parquet (bytes in the file);
* :mod:`.webdataset`: WebDataset tar shards, streamed with the standard library's ``tarfile``.

Every reader yields ``pyarrow.RecordBatch``es of a bounded size, never the whole dataset; image bytes either
stay where they are (files, tar members, read when a row is sent) or travel in the batch only as far as the
worker that sends them.
"""
