// Fuzz target for the save file a restore reads (broker/flows/save_file): its preamble, JSON
// header and trailer, from a file anyone with write access to the save directory may have cut
// short, edited or replaced.
//
// Input: the bytes of a save file. They are written to an in-memory file (memfd, made once per
// process) and read with read_layout, as a restore reads the file it was given. Then the input
// is written again as the stream of a save file the target builds with begin() and trailer(),
// around the domain the first read found (or, failing that, the input itself read as JSON).
//
// Invariants checked (a violation aborts):
//  - every refusal is invalid_argument naming the field the caller passed;
//  - a layout that reads has stream_offset + stream_length + kTrailerSize equal to the file's
//    size, a header of at most kMaxHeader bytes whose CRC is header_crc, and an object as domain;
//  - the checksum over header and stream, summed in chunks as the copy sums them, is what one
//    pass over the same bytes gives; it matches the trailer's exactly when the file is intact;
//  - a file built with begin(domain), a stream and trailer(length, crc) reads back with the same
//    domain, offsets and crc, and its stream sums to that crc.
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <boost/json/parse.hpp>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <string_view>

#include "broker/core/errc.hpp"
#include "broker/flows/save_file.hpp"
#include "fdpass/unique_fd.hpp"
#include "json_compare.hpp"

namespace {

namespace json = boost::json;
namespace save_file = broker::flows::save_file;

constexpr std::string_view kField = "path";

// The line of the broken invariant goes to stderr: a crash report then says which it was.
void check(bool ok, int line = __builtin_LINE()) {
  if (ok) return;
  std::fprintf(stderr, "invariant broken at %s:%d\n", __FILE__, line);
  std::abort();
}

// One in-memory file for the whole run: no disk, and no open or unlink per input.
fdpass::BorrowedFd file() {
  static const fdpass::UniqueFd fd(::memfd_create("qb-save-file-fuzz", MFD_CLOEXEC));
  check(fd.get() >= 0);
  return fdpass::BorrowedFd(fd);
}

void put(std::string_view bytes) {
  const int fd = file().get();
  check(::ftruncate(fd, 0) == 0);
  std::size_t done = 0;
  while (done < bytes.size()) {
    ssize_t n = ::pwrite(fd, bytes.data() + done, bytes.size() - done, static_cast<off_t>(done));
    check(n > 0);
    done += static_cast<std::size_t>(n);
  }
}

// The sum the copy computes: it continues from header_crc in chunks of whatever read returned.
std::uint32_t chunked_crc(std::uint32_t crc, std::string_view stream) {
  std::size_t chunk = 1;
  while (!stream.empty()) {
    const std::size_t n = std::min(chunk, stream.size());
    crc = save_file::checksum(crc, stream.data(), n);
    stream.remove_prefix(n);
    chunk = chunk * 3 + 1;
  }
  return crc;
}

save_file::Layout checked_read(std::string_view bytes, bool& ok) {
  put(bytes);
  auto layout = save_file::read_layout(file(), kField);
  ok = layout.has_value();
  if (!ok) {
    check(layout.error().code == broker::errc::invalid_argument);
    check(layout.error().field == kField);
    return {};
  }
  const auto& l = *layout;
  check(l.stream_offset + l.stream_length + save_file::kTrailerSize == bytes.size());
  check(l.stream_offset >= save_file::kPreambleSize);
  const std::size_t header_len = l.stream_offset - save_file::kPreambleSize;
  check(header_len > 0 && header_len <= save_file::kMaxHeader);
  const std::string_view header = bytes.substr(save_file::kPreambleSize, header_len);
  check(l.header_crc == save_file::checksum(0, header.data(), header.size()));
  check(l.domain.is_object());
  const std::string_view stream = bytes.substr(l.stream_offset, l.stream_length);
  const std::uint32_t whole = save_file::checksum(0, bytes.data() + save_file::kPreambleSize,
                                                  header_len + stream.size());
  check(chunked_crc(l.header_crc, stream) == whole);
  return *layout;
}

// The domain to save: the one the input's own header held, else the input read as JSON. Up to
// 31 levels: the header nests the domain one level down and read_layout parses with Boost's
// default limit of 32.
json::value domain_for(const save_file::Layout& read, bool read_ok, std::string_view input) {
  if (read_ok) return read.domain;
  json::parse_options opts;
  opts.max_depth = 31;
  boost::system::error_code ec;
  json::value v = json::parse(input, ec, {}, opts);
  if (ec || !v.is_object()) return json::object();
  return v;
}

void round_trip(const json::value& domain, std::string_view stream) {
  if (!qb_fuzz::all_finite(domain)) return;
  const std::string head = save_file::begin(domain);
  const std::size_t header_len = head.size() - save_file::kPreambleSize;
  if (header_len > save_file::kMaxHeader) return;
  const std::uint32_t crc = save_file::checksum(
      save_file::checksum(0, head.data() + save_file::kPreambleSize, header_len), stream.data(),
      stream.size());
  const std::string bytes = head + std::string(stream) + save_file::trailer(stream.size(), crc);
  bool ok = false;
  auto l = checked_read(bytes, ok);
  check(ok);
  check(qb_fuzz::same_json(l.domain, domain));
  check(l.stream_offset == head.size() && l.stream_length == stream.size() && l.crc == crc);
  check(chunked_crc(l.header_crc, stream) == crc);
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  const std::string_view in(reinterpret_cast<const char*>(data), size);
  bool ok = false;
  const auto layout = checked_read(in, ok);
  round_trip(domain_for(layout, ok, in), in);
  return 0;
}
