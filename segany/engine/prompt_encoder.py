"""The prompt encoder at inference: the dense positional encoding and the point-type table kept until
their weights change, point types added by one gather. Twin of segany.modeling.prompt_encoder's."""
from __future__ import annotations

import torch

from ..modeling import prompt_encoder as plain
from .cache import kept_until_changed
from .twin import register


class PromptEncoder(plain.PromptEncoder):
    def get_dense_pe(self) -> torch.Tensor:
        """Positional encoding of the image embedding grid, (1, C, 64, 64).

        It depends only on the (fixed) Fourier matrix, so it is computed once and kept (its sin/cos over
        4096 cells otherwise cost as much as a small decoder pass); the key includes the matrix's version
        counter, so loading new weights recomputes it.
        """
        gaussian = self.pe_layer.positional_encoding_gaussian_matrix
        size = tuple(self.image_embedding_size)
        return kept_until_changed(
            self, f"_dense_pe_{size}", [gaussian], lambda: self.pe_layer(self.image_embedding_size).unsqueeze(0)
        )

    def _embed_points(self, points: torch.Tensor, labels: torch.Tensor, pad: bool) -> torch.Tensor:
        """(B, N, 2) pixel coordinates, (B, N) labels -> (B, N (+1), C): the positional encoding of each
        point's pixel centre plus its type's embedding (label 0 negative, 1 positive); label -1 ('not a
        point') is the not-a-point embedding alone, other labels add nothing."""
        embedding = self.pe_layer.forward_with_coords(points + 0.5, self.input_image_size)
        # One gather from a table by label + 2 (clamped): nothing (labels below -1), the not-a-point
        # embedding (-1), the negative (0) and positive (1) type embeddings, nothing (other labels); a
        # 'not a point' keeps no positional encoding (times 0.0). The sums of the released masked adds.
        index = (labels + 2).clamp(0, 4).long()  # (labels may come as floats)
        encoding = embedding * (labels != -1)[..., None]
        embedding = encoding + self._type_table()[index]
        if pad:
            # Without a box, a 'not a point' token is appended, as the released model was trained (its
            # positional encoding is replaced by the not-a-point embedding, so it is not computed).
            pad_token = self.not_a_point_embed.weight.expand(embedding.shape[0], 1, -1)
            embedding = torch.cat([embedding, pad_token], dim=1)
        return embedding

    def _type_table(self) -> torch.Tensor:
        """(5, C): zeros, not-a-point, negative, positive, zeros (see _embed_points); kept until one of
        them changes."""
        negative, positive = self.point_embeddings[0].weight, self.point_embeddings[1].weight
        not_a_point = self.not_a_point_embed.weight

        def build() -> torch.Tensor:
            zero = torch.zeros_like(negative)
            return torch.cat([zero, not_a_point, negative, positive, zero])

        return kept_until_changed(self, "_type_table_cache", [negative, positive, not_a_point], build)


register(plain.PromptEncoder, PromptEncoder)
