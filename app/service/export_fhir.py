"""The ``fhir`` result format: FHIR R4 NDJSON, one ``Bundle`` of type ``collection`` a line.

Each patient's bundle holds a ``Patient`` (gender, ``birthDate`` from :mod:`app.dating`, the
synthetic id as identifier), one ``Encounter`` per visit (``finished``, class ``IMP``
inpatient, ``period`` start and end) and one ``Condition`` per code (category
``encounter-diagnosis``; ``code.coding`` with system ``http://hl7.org/fhir/sid/icd-9-cm``, the
dotted code and the CMS title as display; the encounter and subject referenced; onset at the
visit's start). Resource ids are UUIDs derived from the result id, patient number and position,
so the same result always has the same ids, and references use ``urn:uuid:`` full URLs as a
``collection`` bundle allows. Times are written in UTC (``Z``), as FHIR requires a zone.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Iterator
from datetime import datetime

from app.icd9.codes import dotted_code
from app.service.exports import DATE, ExportContext, code_detail, ndjson_lines

__all__ = ["ICD9_SYSTEM", "fhir_bundle", "fhir_ndjson"]

ICD9_SYSTEM = "http://hl7.org/fhir/sid/icd-9-cm"
ACT_CODE = "http://terminology.hl7.org/CodeSystem/v3-ActCode"
CONDITION_CATEGORY = "http://terminology.hl7.org/CodeSystem/condition-category"
PATIENT_ID_SYSTEM = "urn:synthehr:patient"
GENDER = {"F": "female", "M": "male"}
_NAMESPACE = uuid.UUID("6b1f0c9e-51a4-4a52-9a0f-6e0d3c1a7b21")


def _instant(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def fhir_bundle(row: dict, context: ExportContext, result_id: str) -> dict:
    """One patient as a FHIR R4 ``collection`` Bundle (a plain dict, ready for JSON)."""
    n = int(row["n"])
    dates = context.dates(row)

    def rid(*parts: object) -> str:
        return str(uuid.uuid5(_NAMESPACE, ":".join(str(p) for p in (result_id, n, *parts))))

    patient_id = rid("patient")
    subject = {"reference": f"urn:uuid:{patient_id}"}
    entries = [{"fullUrl": f"urn:uuid:{patient_id}", "resource": {
        "resourceType": "Patient", "id": patient_id,
        "identifier": [{"system": PATIENT_ID_SYSTEM, "value": row["id"]}],
        "gender": GENDER[row["sex"]], "birthDate": dates.birth.strftime(DATE)}}]
    for seq, (visit, (start, end)) in enumerate(zip(row["visits"], dates.visits, strict=True),
                                                start=1):
        encounter_id = rid("encounter", seq)
        entries.append({"fullUrl": f"urn:uuid:{encounter_id}", "resource": {
            "resourceType": "Encounter", "id": encounter_id, "status": "finished",
            "class": {"system": ACT_CODE, "code": "IMP", "display": "inpatient encounter"},
            "subject": subject, "period": {"start": _instant(start), "end": _instant(end)}}})
        for k, code in enumerate(visit):
            condition_id = rid("condition", seq, k)
            coding = {"system": ICD9_SYSTEM, "code": dotted_code(code)}
            description = code_detail(code)["description"]
            if description:
                coding["display"] = description
            entries.append({"fullUrl": f"urn:uuid:{condition_id}", "resource": {
                "resourceType": "Condition", "id": condition_id,
                "category": [{"coding": [{"system": CONDITION_CATEGORY,
                                          "code": "encounter-diagnosis"}]}],
                "code": {"coding": [coding]}, "subject": subject,
                "encounter": {"reference": f"urn:uuid:{encounter_id}"},
                "onsetDateTime": _instant(start)}})
    return {"resourceType": "Bundle", "id": rid("bundle"), "type": "collection",
            "entry": entries}


def fhir_ndjson(rows: Iterable[dict], context: ExportContext,
                result_id: str) -> Iterator[bytes]:
    """One bundle a line, flushed in blocks of about 64 KiB."""
    return ndjson_lines(fhir_bundle(row, context, result_id) for row in rows)
