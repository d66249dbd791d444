"""Enrich wine reviews with two dependent LLM chains: the dask-llm quickstart.

The code is in ``dask_llm/demo.py`` (so that ``dask-llm demo`` runs it from an
installed package too): two structured-output chains, the second reading the
first's summary, enriched over a Dask DataFrame and written to Parquet.

    python examples/wine_reviews.py                 # the built-in simulator, the shipped sample
    python examples/wine_reviews.py --input ../shared/data/wine_reviews_sample.csv --rows 200
    OPENAI_API_KEY=sk-... python examples/wine_reviews.py --model gpt-4o-mini
"""

from dask_llm.demo import main

if __name__ == "__main__":
    main()
