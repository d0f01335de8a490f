"""SKELETON: the library page (``/``): cards, filters, search, sort, paging."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request

from ckptlab.library.catalog import Catalog
from ckptlab.web.deps import catalog
from ckptlab.web.query import Filters, search
from ckptlab.web.templating import page

router = APIRouter()


@router.get("/")
def library(request: Request, cat: Catalog = Depends(catalog)):
    f = Filters.from_query(request.query_params)
    return page(request, "library.html", nav="library", result=search(cat, f))
