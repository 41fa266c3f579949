"""The ``omop`` result format: a zip of OMOP CDM 5.4 tables, written as a stream.

Members (comma-separated, header row, the CDM 5.4 column names in the CDM's order; dates
``YYYY-MM-DD``, datetimes ``YYYY-MM-DD HH:MM:SS``, nulls empty):

* ``person.csv``: ``person_id`` is the patient's number in the cohort; gender concepts 8532
  (FEMALE) / 8507 (MALE); year, month and day of birth from the dating scheme
  (:mod:`app.dating`); race and ethnicity 0 (not generated).
* ``observation_period.csv``: one period per person, first visit start to last visit end.
* ``visit_occurrence.csv``: one inpatient visit (9201) per generated visit.
* ``condition_occurrence.csv``: one row per code, dated at its visit's start and end;
  ``condition_source_value`` is the ICD-9-CM code (undotted, as MIMIC and the generators write
  it); ``condition_source_concept_id`` and ``condition_concept_id`` come from the deployment's
  Athena vocabulary (:mod:`app.athena`: the ICD9CM concept and its "Maps to" standard concept)
  and are 0 without one, as the CDM conventions allow; ``condition_status_concept_id`` is
  32902 (primary diagnosis) for a visit's first code and 32908 (secondary) for the rest.

Every record's type concept is 32817 (EHR). Visit and condition ids number rows in cohort
order, so the four passes over the cohort (one per table) agree.
"""

from __future__ import annotations

import zipfile
from collections.abc import Callable, Iterable, Iterator

from app.service.exports import DATE, FMT, ExportContext, _Sink, _zip_csv

__all__ = ["CONDITION_OCCURRENCE", "OBSERVATION_PERIOD", "PERSON", "TABLES",
           "VISIT_OCCURRENCE", "omop_zip"]

# CDM 5.4 column lists (OHDSI CommonDataModel, inst/csv/OMOP_CDMv5.4_Field_Level.csv).
PERSON = ("person_id", "gender_concept_id", "year_of_birth", "month_of_birth",
          "day_of_birth", "birth_datetime", "race_concept_id", "ethnicity_concept_id",
          "location_id", "provider_id", "care_site_id", "person_source_value",
          "gender_source_value", "gender_source_concept_id", "race_source_value",
          "race_source_concept_id", "ethnicity_source_value", "ethnicity_source_concept_id")
OBSERVATION_PERIOD = ("observation_period_id", "person_id", "observation_period_start_date",
                      "observation_period_end_date", "period_type_concept_id")
VISIT_OCCURRENCE = ("visit_occurrence_id", "person_id", "visit_concept_id", "visit_start_date",
                    "visit_start_datetime", "visit_end_date", "visit_end_datetime",
                    "visit_type_concept_id", "provider_id", "care_site_id",
                    "visit_source_value", "visit_source_concept_id", "admitted_from_concept_id",
                    "admitted_from_source_value", "discharged_to_concept_id",
                    "discharged_to_source_value", "preceding_visit_occurrence_id")
CONDITION_OCCURRENCE = ("condition_occurrence_id", "person_id", "condition_concept_id",
                        "condition_start_date", "condition_start_datetime",
                        "condition_end_date", "condition_end_datetime",
                        "condition_type_concept_id", "condition_status_concept_id",
                        "stop_reason", "provider_id", "visit_occurrence_id", "visit_detail_id",
                        "condition_source_value", "condition_source_concept_id",
                        "condition_status_source_value")
TABLES = {"person": PERSON, "observation_period": OBSERVATION_PERIOD,
          "visit_occurrence": VISIT_OCCURRENCE, "condition_occurrence": CONDITION_OCCURRENCE}

GENDER = {"F": 8532, "M": 8507}
INPATIENT_VISIT = 9201
EHR = 32817
PRIMARY, SECONDARY = 32902, 32908


def _person(rows: Iterable[dict], context: ExportContext) -> Iterator[list]:
    for row in rows:
        n = int(row["n"])
        birth = context.dates(row).birth
        yield [n, GENDER[row["sex"]], birth.year, birth.month, birth.day, birth.strftime(FMT),
               0, 0, "", "", "", row["id"], row["sex"], 0, "", 0, "", 0]


def _observation_period(rows: Iterable[dict], context: ExportContext) -> Iterator[list]:
    for row in rows:
        visits = context.dates(row).visits
        if visits:
            n = int(row["n"])
            yield [n, n, visits[0][0].strftime(DATE), visits[-1][1].strftime(DATE), EHR]


def _visit_occurrence(rows: Iterable[dict], context: ExportContext) -> Iterator[list]:
    visit_id = 0
    for row in rows:
        n = int(row["n"])
        previous = ""
        for seq, (start, end) in enumerate(context.dates(row).visits, start=1):
            visit_id += 1
            yield [visit_id, n, INPATIENT_VISIT, start.strftime(DATE), start.strftime(FMT),
                   end.strftime(DATE), end.strftime(FMT), EHR, "", "", f"{row['id']}-v{seq}",
                   0, 0, "", 0, "", previous]
            previous = visit_id


def _condition_occurrence(rows: Iterable[dict], context: ExportContext) -> Iterator[list]:
    visit_id = condition_id = 0
    concepts = context.concepts
    for row in rows:
        n = int(row["n"])
        for visit, (start, end) in zip(row["visits"], context.dates(row).visits, strict=True):
            visit_id += 1
            for k, code in enumerate(visit):
                condition_id += 1
                source = concepts.source_id(code) if concepts else 0
                standard = concepts.standard_id(code) if concepts else 0
                yield [condition_id, n, standard, start.strftime(DATE), start.strftime(FMT),
                       end.strftime(DATE), end.strftime(FMT), EHR,
                       PRIMARY if k == 0 else SECONDARY, "", "", visit_id, "", code, source,
                       "primary" if k == 0 else "secondary"]


def omop_zip(rows_factory: Callable[[], Iterable[dict]],
             context: ExportContext) -> Iterator[bytes]:
    """The zip's bytes as they are compressed: one pass over the cohort per table."""
    sink = _Sink()
    writers = (("person", _person), ("observation_period", _observation_period),
               ("visit_occurrence", _visit_occurrence),
               ("condition_occurrence", _condition_occurrence))
    with zipfile.ZipFile(sink, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=6) as zf:
        for name, rows_of in writers:
            yield from _zip_csv(zf, sink, f"{name}.csv", TABLES[name],
                                rows_of(rows_factory(), context))
    yield sink.drain()
