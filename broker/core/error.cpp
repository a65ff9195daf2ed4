#include "broker/core/error.hpp"

#include <stdexcept>

namespace broker {

void throw_exception_from_error(const Error& e, const boost::source_location&) {
  throw std::system_error(e.code, e.message);
}

}  // namespace broker
