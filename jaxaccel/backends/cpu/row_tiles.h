// Rows of x in register tiles, shared by the matmul kernels here: rows [first, m) in tiles of
// MAX rows, then one tile of the 1..MAX-1 left over. `tile(rows, row)` runs one tile, `rows`
// a std::integral_constant<int, R> (a template argument for the tile's register arrays).

#pragma once

#include <cstdint>
#include <type_traits>

namespace jaxaccel {

template <int MAX, typename Tile>
void row_tiles(int64_t first, int64_t m, Tile&& tile) {
  static_assert(MAX >= 1 && MAX <= 6, "tiles of 1 to 6 rows");
  int64_t row = first;
  for (; row + MAX <= m; row += MAX) tile(std::integral_constant<int, MAX>{}, row);
  switch (m - row) {
    case 5: if constexpr (MAX > 5) tile(std::integral_constant<int, 5>{}, row); break;
    case 4: if constexpr (MAX > 4) tile(std::integral_constant<int, 4>{}, row); break;
    case 3: if constexpr (MAX > 3) tile(std::integral_constant<int, 3>{}, row); break;
    case 2: if constexpr (MAX > 2) tile(std::integral_constant<int, 2>{}, row); break;
    case 1: if constexpr (MAX > 1) tile(std::integral_constant<int, 1>{}, row); break;
    default: break;
  }
}

}  // namespace jaxaccel
