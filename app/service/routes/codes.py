"""``GET /v1/codes/{code}``: an ICD-9-CM code's category, chapter and description."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import HTTPException, Path

from app.icd9.codes import InvalidCodeError
from app.icd9.hierarchy import load_hierarchy
from app.runtime.requests import cms_codes
from app.service.dependencies import State
from app.service.errors import InvalidField
from app.service.routes import versioned
from app.service.schemas import CodeDetail

__all__ = ["router"]

router = versioned()


@router.get("/codes/{code}", response_model=CodeDetail, tags=["model"],
            summary="An ICD-9-CM code's category, chapter and description",
            responses={404: {"description": "Well-formed, but not a code of CMS v32"},
                       422: {"description": "Not an ICD-9-CM code"}})
def get_code(code: Annotated[str, Path(max_length=16, examples=["250.00"],
                                       description="Any spelling: `250.00` or `25000`")],
             state: State) -> Any:
    try:
        info = load_hierarchy().lookup(code)
    except InvalidCodeError as err:
        raise InvalidField("code", str(err), where="path") from None
    if info.code not in cms_codes():
        raise HTTPException(404, f"{info.code} is shaped like an ICD-9-CM code but is not in "
                                 "CMS ICD-9-CM v32 (neither a billable code nor a category or "
                                 "subcategory of one)")
    gen = state.generator
    return CodeDetail(code=info.code, category=info.category, chapter=info.chapter.key,
                      chapter_title=info.chapter.title, billable=info.billable,
                      description=info.description,
                      category_description=info.category_description,
                      in_model_vocabulary=gen.has_code(info.code) if gen is not None else None)
