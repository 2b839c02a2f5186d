"""The `tape_archive` asset: exports bundled by the tape archiver into daily archive files.

External: Dagster never computes it. `archive_sensor` records what the archiver
announces and materialises the partitions (same as `raw_export`) whose events
were archived, so the UI shows what is on tape.
"""

from dagster import AssetDep, AssetSpec, MultiPartitionsDefinition

TAPE_ARCHIVE = "tape_archive"


def build_tape_archive(partitions_def: MultiPartitionsDefinition) -> AssetSpec:
    return AssetSpec(
        TAPE_ARCHIVE,
        deps=[AssetDep("raw_export")],  # same partitions: identity mapping
        partitions_def=partitions_def,
        group_name="export",
        kinds={"rabbitmq"},
        description="Exports on the national data archive's tape: one daily archive file "
        "per experiment, as announced by the tape archiver on RabbitMQ (exchange "
        "surf-data-archive). Materialised without a run by archive_sensor; metadata "
        "names the archive files and their member counts.",
    )
