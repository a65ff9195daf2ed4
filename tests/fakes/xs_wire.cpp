#include "xs_wire.hpp"

#include <cerrno>  // before xs_wire.h: its error table exists only when EINVAL is defined
#include <cstring>
#include <stdexcept>

extern "C" {
#include <xen/io/xs_wire.h>
}

namespace qbtest::xs {

static_assert(header_size == sizeof(xsd_sockmsg));
static_assert(payload_max == XENSTORE_PAYLOAD_MAX);
constexpr bool same(std::uint32_t ours, std::uint32_t theirs) {
  return ours == theirs;
}
static_assert(same(control, XS_CONTROL) && same(directory, XS_DIRECTORY) && same(read, XS_READ));
static_assert(same(get_perms, XS_GET_PERMS) && same(watch, XS_WATCH));
static_assert(same(unwatch, XS_UNWATCH) && same(transaction_start, XS_TRANSACTION_START));
static_assert(same(transaction_end, XS_TRANSACTION_END));
static_assert(same(get_domain_path, XS_GET_DOMAIN_PATH) && same(write, XS_WRITE));
static_assert(same(mkdir, XS_MKDIR) && same(rm, XS_RM) && same(set_perms, XS_SET_PERMS));
static_assert(same(watch_event, XS_WATCH_EVENT) && same(error, XS_ERROR));
static_assert(same(reset_watches, XS_RESET_WATCHES) && same(directory_part, XS_DIRECTORY_PART));
static_assert(same(type_count, XS_TYPE_COUNT));

Header decode_header(std::string_view bytes) {
  if (bytes.size() < header_size) throw std::invalid_argument("xs header: short");
  xsd_sockmsg m;
  std::memcpy(&m, bytes.data(), header_size);
  return {m.type, m.req_id, m.tx_id, m.len};
}

std::string encode_header(const Header& h) {
  const xsd_sockmsg m{h.type, h.req_id, h.tx_id, h.len};
  std::string out(header_size, '\0');
  std::memcpy(out.data(), &m, header_size);
  return out;
}

std::string encode(std::uint32_t type, std::uint32_t req_id, std::uint32_t tx_id,
                   std::string_view payload) {
  if (payload.size() > payload_max) throw std::length_error("xs payload over 4096 bytes");
  std::string out =
      encode_header({type, req_id, tx_id, static_cast<std::uint32_t>(payload.size())});
  out.append(payload);
  return out;
}

std::string encode_reply(const Header& request, std::string_view payload) {
  return encode(request.type, request.req_id, request.tx_id, payload);
}

std::string encode_error(const Header& request, std::string_view name) {
  std::string payload(name);
  payload.push_back('\0');
  return encode(error, request.req_id, request.tx_id, payload);
}

std::string encode_event(std::string_view path, std::string_view token) {
  std::string payload(path);
  payload.push_back('\0');
  payload.append(token);
  payload.push_back('\0');
  return encode(watch_event, 0, 0, payload);
}

std::optional<std::vector<std::string_view>> split_words(std::string_view payload) {
  std::vector<std::string_view> words;
  if (payload.empty()) return words;
  if (payload.back() != '\0') return std::nullopt;
  std::size_t start = 0;
  while (start < payload.size()) {
    const std::size_t nul = payload.find('\0', start);
    words.push_back(payload.substr(start, nul - start));
    start = nul + 1;
  }
  return words;
}

std::string join_words(const std::vector<std::string>& words) {
  std::string out;
  for (const auto& w : words) {
    out.append(w);
    out.push_back('\0');
  }
  return out;
}

Decoder::Status Decoder::next(Message& out) {
  if (failed_ != Status::need_more) return failed_;
  if (buffer_.size() < header_size) return Status::need_more;
  const Header h = decode_header(buffer_);
  if (h.type >= type_count) return failed_ = Status::bad_header;
  if (h.len > payload_max) return failed_ = Status::oversized;
  if (buffer_.size() < header_size + h.len) return Status::need_more;
  out.header = h;
  out.payload = buffer_.substr(header_size, h.len);
  buffer_.erase(0, header_size + h.len);
  return Status::message;
}

}  // namespace qbtest::xs
