"""Chains the tests share: the wine workload in miniature, against a simulator URL."""

from __future__ import annotations

from typing import Any, Literal

from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompts import ChatPromptTemplate
from langchain_core.runnables import Runnable
from langchain_openai import ChatOpenAI
from pydantic import BaseModel, Field


class Summary(BaseModel):
    summary: str
    sentiment: Literal["positive", "neutral", "negative"]


class Features(BaseModel):
    features: list[str] = Field(min_length=5, max_length=5)
    score: int = Field(ge=0, le=100)


def llm(base_url: str, **kwargs: object) -> ChatOpenAI:
    kwargs.setdefault("model", "gpt-4o-mini")
    return ChatOpenAI(base_url=base_url, **kwargs)  # type: ignore[arg-type]


def summary_chain(base_url: str, **kwargs: object) -> Runnable:
    prompt = ChatPromptTemplate.from_template("Summarise this review: {description}")
    return prompt | llm(base_url, **kwargs).with_structured_output(Summary)


def features_chain(base_url: str, **kwargs: object) -> Runnable:
    prompt = ChatPromptTemplate.from_template(
        "Five features of {title} from {country}, given: {summary}"
    )
    return prompt | llm(base_url, **kwargs).with_structured_output(
        Features, method="function_calling"
    )


def wine_chains(base_url: str) -> list[Any]:
    """The wine workload: a summary, then five features of it (a dependent chain)."""
    import dask_llm

    return [
        dask_llm.Chain(summary_chain(base_url), name="summarize"),
        dask_llm.Chain(features_chain(base_url), name="features"),
    ]


def text_chain(base_url: str) -> Runnable:
    prompt = ChatPromptTemplate.from_template("One word for {description}")
    return prompt | llm(base_url) | StrOutputParser()


def fake_chat_chain(rows: int = 50) -> Runnable:
    """A chain on a chat model that is not ChatOpenAI (langchain-core's fake): its requests
    never pass dask-llm's transport."""
    from langchain_core.language_models.fake_chat_models import FakeListChatModel

    prompt = ChatPromptTemplate.from_template("One word for {description}")
    return prompt | FakeListChatModel(responses=["ripe"] * rows) | StrOutputParser()
