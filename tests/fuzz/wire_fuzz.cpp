// Fuzz target for the QMP wire layer: bytes from a hostile peer, framed, parsed and matched.
//
// Input: the first byte picks the read size (how the stream is chunked) and the id mode, the
// rest is the stream.
// Lines are parsed by one MessageParser for the whole stream, as a connection does.
// Invariants checked (a violation aborts): the decoder never holds more than one line bound plus
// one read; the reused parser gives what a fresh one gives for the same line (it may refuse a
// line a fresh one accepts only for its budget: it keeps up to 64 KiB of work stack, see
// qmp/wire.hpp); a command that encode_command() accepted is always valid JSON.
#include <boost/json/parse.hpp>
#include <boost/json/serialize.hpp>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <string_view>
#include <variant>

#include "qmp/mux.hpp"
#include "qmp/wire.hpp"

namespace {

// Serialized, so that a NaN (Boost.JSON reads 0e400 as one) equals itself.
bool same_json(const boost::json::value& a, const boost::json::value& b) {
  return boost::json::serialize(a) == boost::json::serialize(b);
}

bool same_outcome(const qmp::Result<qmp::Message>& reused,
                  const qmp::Result<qmp::Message>& fresh) {
  if (!reused) {
    if (!fresh) return reused.error().code == fresh.error().code;
    return reused.error().is(qmp::errc::message_too_large);
  }
  if (!fresh || reused->index() != fresh->index()) return false;
  if (const auto* r = std::get_if<qmp::Return>(&*reused)) {
    const auto& f = std::get<qmp::Return>(*fresh);
    return r->id == f.id && same_json(r->value, f.value);
  }
  if (const auto* e = std::get_if<qmp::Event>(&*reused)) {
    const auto& f = std::get<qmp::Event>(*fresh);
    return e->name == f.name && same_json(e->data, f.data) && e->memory == f.memory;
  }
  return true;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  if (size == 0) return 0;
  const std::size_t read_size = 1 + (data[0] % 64) * (data[0] % 64);
  // The top bit of the first byte picks the id mode.
  std::string_view stream(reinterpret_cast<const char*>(data + 1), size - 1);

  qmp::Limits limits;
  limits.max_line = 4096;
  limits.max_depth = 32;
  limits.max_message_memory = 256 * 1024;
  qmp::LineDecoder decoder(limits.max_line, read_size);
  qmp::MessageParser parser(limits);
  qmp::Mux<int> mux((data[0] & 0x80) != 0 ? qmp::IdMode::wire : qmp::IdMode::positional, 4);
  for (int i = 0; i < 6; ++i) mux.issue(i, i == 2);
  mux.abandon(2);
  mux.abandon(4);

  while (!stream.empty()) {
    std::size_t n = std::min(read_size, stream.size());
    auto buf = decoder.prepare(n);
    std::copy_n(stream.data(), n, buf.data());
    decoder.commit(n);
    stream.remove_prefix(n);
    if (decoder.peak_capacity() > limits.max_line + 1 + read_size) std::abort();
    for (;;) {
      auto line = decoder.next_line();
      if (!line) return 0;  // connection error: the client stops here
      if (!*line) break;
      auto msg = parser.parse(**line);
      if (!same_outcome(msg, qmp::parse_message(**line, limits))) std::abort();
      if (!msg) return 0;
      if (auto* r = std::get_if<qmp::Return>(&*msg)) {
        mux.on_reply(r->id, false);
        if (const auto* args = r->value.if_object()) {
          auto cmd = qmp::encode_command("fuzz", *args, limits);
          if (cmd) {
            boost::system::error_code ec;
            (void)boost::json::parse(cmd->line(mux.next_id()), ec);
            if (ec) std::abort();
          }
        }
      } else if (auto* e = std::get_if<qmp::ErrorReply>(&*msg)) {
        mux.on_reply(e->id, true);
      } else if (auto* ev = std::get_if<qmp::Event>(&*msg)) {
        if (ev->name.empty() && ev->memory == 0) std::abort();
      }
    }
  }
  return 0;
}
