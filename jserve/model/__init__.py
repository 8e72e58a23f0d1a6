"""The decoder model: params (layout, loading, random init) and the ragged-batch forward."""
