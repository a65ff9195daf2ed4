// The xenstore wire format (xen/io/xs_wire.h) as pure functions over bytes, for the fake
// xenstored and for fuzzing: no I/O, no state beyond the decoder's buffer.
//
// A message is a 16-byte header {u32 type, req_id, tx_id, len} in host byte order followed by
// `len` payload bytes, at most XENSTORE_PAYLOAD_MAX (4096). Payloads are NUL-terminated words,
// except a WRITE's value and a READ reply, which are raw bytes. Errors travel as the errno's
// name ("ENOENT\0") in a message of type XS_ERROR.
#pragma once

#include <cstddef>
#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

namespace qbtest::xs {

inline constexpr std::size_t header_size = 16;
inline constexpr std::size_t payload_max = 4096;

// The request and reply types of xs_wire.h that the fake speaks (checked against the header
// in xs_wire.cpp, so the two cannot drift).
enum Type : std::uint32_t {
  control = 0,
  directory = 1,
  read = 2,
  get_perms = 3,
  watch = 4,
  unwatch = 5,
  transaction_start = 6,
  transaction_end = 7,
  get_domain_path = 10,
  write = 11,
  mkdir = 12,
  rm = 13,
  set_perms = 14,
  watch_event = 15,
  error = 16,
  reset_watches = 21,
  directory_part = 22,
  type_count = 23,  // XS_TYPE_COUNT: a type at or above it is a malformed header
};

struct Header {
  std::uint32_t type = 0;
  std::uint32_t req_id = 0;
  std::uint32_t tx_id = 0;
  std::uint32_t len = 0;
};

struct Message {
  Header header;
  std::string payload;
};

Header decode_header(std::string_view bytes);  // the first header_size bytes
std::string encode_header(const Header& h);

// A whole message; `payload` must fit in payload_max (a bug otherwise: throws).
std::string encode(std::uint32_t type, std::uint32_t req_id, std::uint32_t tx_id,
                   std::string_view payload);
// The reply to `request` with `payload`, its type, req_id and tx_id echoed.
std::string encode_reply(const Header& request, std::string_view payload);
// An XS_ERROR reply to `request`: `name` ("ENOENT") and its NUL.
std::string encode_error(const Header& request, std::string_view name);
std::string encode_event(std::string_view path, std::string_view token);

// The NUL-terminated words of `payload`; nullopt when its last byte is not a NUL (an empty
// payload has no words). The views point into `payload`.
std::optional<std::vector<std::string_view>> split_words(std::string_view payload);
// The words each followed by a NUL: the inverse of split_words.
std::string join_words(const std::vector<std::string>& words);

// Takes bytes as they arrive and yields whole messages. After an error it yields that error
// forever: a stream with a bad header has no next message boundary to resync on.
class Decoder {
 public:
  enum class Status { message, need_more, bad_header, oversized };

  void feed(std::string_view bytes) { buffer_.append(bytes); }
  Status next(Message& out);
  std::size_t buffered() const { return buffer_.size(); }

 private:
  std::string buffer_;
  Status failed_ = Status::need_more;
};

}  // namespace qbtest::xs
