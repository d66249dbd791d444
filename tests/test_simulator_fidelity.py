"""Any chain can be dry-run: schemas in format instructions, json_mode, streaming usage."""

from __future__ import annotations

import asyncio
import json
from typing import Any, Literal

import openai
import pytest
from langchain_core.exceptions import OutputParserException
from langchain_core.messages import AIMessageChunk
from langchain_core.output_parsers import JsonOutputParser, PydanticOutputParser
from langchain_core.prompts import ChatPromptTemplate
from langchain_openai import ChatOpenAI
from pydantic import BaseModel, Field

from dask_llm.simulator import Simulator

WINES = ["a Barolo", "a Chablis", "a Rioja Gran Reserva", "an Assyrtiko", "a Mosel Kabinett"]


class Grape(BaseModel):
    name: str
    share: float = Field(ge=0, le=1)


class Review(BaseModel):
    summary: str = Field(description="two sentences")
    sentiment: Literal["positive", "neutral", "negative"]
    score: int = Field(ge=80, le=100)
    grapes: list[Grape] = Field(min_length=2, max_length=4)
    tags: list[str]
    organic: bool
    vintage: int | None


def llm(sim: Simulator, **kwargs: Any) -> ChatOpenAI:
    return ChatOpenAI(model="gpt-4o-mini", base_url=sim.base_url, max_retries=0, **kwargs)


def rows() -> list[dict[str, str]]:
    return [{"wine": w} for w in WINES]


def check(review: Review) -> None:
    assert 80 <= review.score <= 100 and 2 <= len(review.grapes) <= 4
    assert all(0 <= g.share <= 1 for g in review.grapes)


# -- format instructions -----------------------------------------------------------------------
def test_pydantic_output_parser_parses_on_every_row(sim: Simulator) -> None:
    parser = PydanticOutputParser(pydantic_object=Review)
    prompt = ChatPromptTemplate.from_template("Review {wine}.\n{format_instructions}").partial(
        format_instructions=parser.get_format_instructions()
    )
    reviews = (prompt | llm(sim) | parser).batch(rows())
    assert len(reviews) == len(WINES)
    for review in reviews:
        assert isinstance(review, Review)
        check(review)
    assert len({r.summary for r in reviews}) == len(WINES)  # answers differ by row


def test_json_output_parser_with_a_model_parses_on_every_row(sim: Simulator) -> None:
    parser = JsonOutputParser(pydantic_object=Review)
    assert "```" in parser.get_format_instructions()  # its own instructions mention fences
    prompt = ChatPromptTemplate.from_messages(
        [("system", "{format_instructions}"), ("human", "Review {wine}.")]
    ).partial(format_instructions=parser.get_format_instructions())
    answers = (prompt | llm(sim) | parser).batch(rows())
    for answer in answers:
        assert isinstance(answer, dict)
        check(Review.model_validate(answer))


def test_json_mode_structured_output_parses_on_every_row(sim: Simulator) -> None:
    instructions = PydanticOutputParser(pydantic_object=Review).get_format_instructions()
    prompt = ChatPromptTemplate.from_messages(
        [("system", "Answer in JSON. {format_instructions}"), ("human", "Review {wine}.")]
    ).partial(format_instructions=instructions)
    chain = prompt | llm(sim).with_structured_output(Review, method="json_mode")
    for review in chain.batch(rows()):
        assert isinstance(review, Review)
        check(review)


def test_json_mode_without_a_schema_gets_a_generic_object(sim: Simulator) -> None:
    chain = ChatPromptTemplate.from_template("Describe {wine} as a JSON object.") | llm(sim).bind(
        response_format={"type": "json_object"}
    )
    content = chain.invoke({"wine": "a Tokaji"}).content
    assert isinstance(json.loads(str(content)), dict)


def test_a_fenced_schema_is_followed_when_the_answer_is_json_anyway(sim: Simulator) -> None:
    schema = json.dumps(Grape.model_json_schema())
    chain = llm(sim).bind(response_format={"type": "json_object"})
    content = chain.invoke(f"Name a grape. Answer with JSON matching:\n```json\n{schema}\n```")
    Grape.model_validate_json(str(content.content))


def test_schema_violation_breaks_format_instruction_answers_too(make_simulator: Any) -> None:
    sim = make_simulator(schema_violation=1.0)
    parser = PydanticOutputParser(pydantic_object=Review)
    prompt = ChatPromptTemplate.from_template("Review {wine}.\n{fi}").partial(
        fi=parser.get_format_instructions()
    )
    with pytest.raises(OutputParserException):
        (prompt | llm(sim) | parser).invoke({"wine": "a Sancerre"})
    assert sim.stats()["faults"]["schema_violation"] == 1


def test_plain_prompts_still_get_prose(sim: Simulator) -> None:
    text = str(llm(sim).invoke("Describe a Gewurztraminer from Alsace.").content)
    assert not text.startswith("{") and text.endswith(".")


# -- streaming usage ---------------------------------------------------------------------------
def test_streaming_usage_reaches_chat_openai_async(sim: Simulator) -> None:
    async def main() -> tuple[Any, AIMessageChunk]:
        # Our own client, closed on this loop: langchain_openai's shared default async client
        # would keep a connection bound to this loop for the next test's loop.
        async with openai.DefaultAsyncHttpxClient() as http:
            model = llm(sim, streaming=True, stream_usage=True, http_async_client=http)
            message = await model.ainvoke("Describe a Merlot from Pomerol.")
            total: AIMessageChunk | None = None
            async for chunk in model.astream("Describe a Cabernet Franc from Chinon."):
                total = chunk if total is None else total + chunk
        assert total is not None
        return message, total

    message, streamed = asyncio.run(main())
    for m in (message, streamed):
        usage = m.usage_metadata
        assert usage is not None and usage["input_tokens"] > 5 and usage["output_tokens"] > 5
        assert usage["total_tokens"] == usage["input_tokens"] + usage["output_tokens"]
    stats = sim.stats()
    assert stats["prompt_tokens"] == (
        message.usage_metadata["input_tokens"] + streamed.usage_metadata["input_tokens"]
    )


def test_streaming_usage_reaches_chat_openai_sync(sim: Simulator) -> None:
    model = llm(sim, streaming=True, stream_usage=True)
    chunks = list(model.stream("Describe a Pinot Noir from Burgundy."))
    total = chunks[0]
    for chunk in chunks[1:]:
        total = total + chunk
    assert isinstance(total, AIMessageChunk) and total.usage_metadata is not None
    assert total.usage_metadata["output_tokens"] == sim.stats()["completion_tokens"]
    assert model.invoke("Describe a Grenache.").usage_metadata is not None


@pytest.mark.parametrize("include_usage", [True, False])
def test_stream_chunks_on_the_wire(sim: Simulator, include_usage: bool) -> None:
    options = {"stream_options": {"include_usage": True}} if include_usage else {}
    with openai.OpenAI(base_url=sim.base_url, api_key="k", max_retries=0) as c:
        stream = c.chat.completions.create(
            model="gpt-4o-mini",
            messages=[{"role": "user", "content": "Describe a Malbec."}],
            stream=True,
            **options,  # type: ignore[arg-type]
        )
        chunks = list(stream)
    if include_usage:
        *body, last = chunks
        assert last.choices == [] and last.usage is not None and last.usage.total_tokens > 0
        assert all(c.usage is None for c in body)
    else:
        assert all(c.usage is None and c.choices for c in chunks)
    assert chunks[0].choices[0].delta.content


# -- values the prompt names ---------------------------------------------------------------
def _tool(name: str, properties: dict[str, Any]) -> dict[str, Any]:
    schema = {"type": "object", "properties": properties, "required": list(properties)}
    return {"type": "function", "function": {"name": name, "parameters": schema}}


def _call(sim: Simulator, text: str, *tools: dict[str, Any], **body: Any) -> Any:
    with openai.OpenAI(base_url=sim.base_url, api_key="k", max_retries=0) as c:
        return c.chat.completions.create(
            model="gpt-4o-mini",
            messages=body.pop("messages", [{"role": "user", "content": text}]),
            tools=list(tools),  # type: ignore[arg-type]
            **body,
        ).choices[0]


NUMBERS = _tool(
    "price_case",
    {
        "bottles": {"type": "integer", "exclusiveMinimum": 0, "maximum": 24},
        "price": {"type": "number", "minimum": 0},
        "vintage": {"anyOf": [{"type": "integer", "minimum": 1900}, {"type": "null"}]},
    },
)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        pytest.param(
            "Price a case of 12 bottles at 18.5 each, vintage 2019.",
            {"bottles": 12, "price": 18.5, "vintage": 2019},
            id="in-order",
        ),
        pytest.param(
            "Vintage 2019: price 18.5 for 12 bottles.",
            {"bottles": 12, "price": 18.5, "vintage": 2019},
            id="next-to-their-names",
        ),
        pytest.param(
            "Price 40 bottles, or 12, at 18.5",  # 40 is over the maximum of bottles
            {"bottles": 12, "price": 40},
            id="within-bounds",
        ),
        pytest.param(
            "price_case(bottles=6, price=30, vintage=2001)",
            {"bottles": 6, "price": 30, "vintage": 2001},
            id="named",
        ),
    ],
)
def test_tool_arguments_take_the_numbers_the_prompt_names(
    sim: Simulator, text: str, expected: dict[str, Any]
) -> None:
    args = json.loads(_call(sim, text, NUMBERS).message.tool_calls[0].function.arguments)
    assert {k: args[k] for k in expected} == expected


def test_tool_arguments_take_quoted_strings_and_enum_words(sim: Simulator) -> None:
    tool = _tool(
        "add_customer",
        {
            "name": {"type": "string"},
            "note": {"type": "string"},
            "tier": {"type": "string", "enum": ["bronze", "silver", "gold"]},
        },
    )
    text = "Add a gold customer named '你好啊集团' with the note \"ships to Lyon\"; don't wait."
    args = json.loads(_call(sim, text, tool).message.tool_calls[0].function.arguments)
    assert args == {"name": "你好啊集团", "note": "ships to Lyon", "tier": "gold"}


def test_the_tool_the_prompt_names_is_called(sim: Simulator) -> None:
    other = _tool("get_weather", {"location": {"type": "string"}})
    choice = _call(sim, "Use price_case for 3 bottles.", other, NUMBERS, tool_choice="required")
    call = choice.message.tool_calls[0]
    assert (
        call.function.name == "price_case" and json.loads(call.function.arguments)["bottles"] == 3
    )
    forced = {"type": "function", "function": {"name": "get_weather"}}
    named = _call(sim, "Use price_case.", other, NUMBERS, tool_choice=forced)
    assert named.message.tool_calls[0].function.name == "get_weather"


def test_after_a_tool_result_the_answer_is_words_unless_a_tool_is_forced(sim: Simulator) -> None:
    call = {"id": "c1", "type": "function", "function": {"name": "price_case", "arguments": "{}"}}
    messages = [
        {"role": "user", "content": "Price 2 bottles."},
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "c1", "content": "36 euros"},
    ]
    free = _call(sim, "", NUMBERS, messages=messages)
    assert free.finish_reason == "stop" and free.message.content
    forced = _call(sim, "", NUMBERS, messages=messages, tool_choice="required")
    assert forced.finish_reason == "tool_calls"


def test_json_mode_answers_with_the_keys_the_prompt_names(sim: Simulator) -> None:
    chain = llm(sim).bind(response_format={"type": "json_object"})
    text = "Tell me about a Fiano. Return JSON with 'grape' and 'region' keys, nothing else."
    assert set(json.loads(str(chain.invoke(text).content))) == {"grape", "region"}
